"""Expert pools on the torch (CPU) path against float64 references; quantisers; replicas and the
least-loaded copy dispatch; weight bytes; quantised experts' logit error on a tiny model."""
import pytest
import torch
import torch.nn.functional as F

import tinymoe
from tinymoe import kernels
from tinymoe.experts import Copy, ExpertPlan, Experts
from tinymoe.kernels import quant
from tinymoe.experts.dispatch import copy_loads, copy_table
from tinymoe.experts.pools import FullPool, build_pool, pool_bytes
from tinymoe.experts.quant import expert_bytes


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


def dense_quantised(ws, precision):
    """`ws(e)` -> (gate, up, down); float64 of their quantised values (kernels.quant's reference)."""
    return lambda e: [quant.dequantize(quant.quantize(w, precision)).double() for w in ws(e)]


@pytest.mark.parametrize("precision", ["full", "int8", "int4"])
@pytest.mark.parametrize("T", [1, 3, 40])
def test_pool_matches_float64(precision, T, bf16_cpu):
    # with bf16 instructions (forced here both ways), copies over 16 rows take torch's bf16 GEMM
    # on dequantised weights; without, the native kernels at any row count
    E, k = 5, 2
    ex = random_experts(E, I=64, D=96)
    ids, w = random_routing(T, k, E - 1)  # the last expert gets no tokens
    x = torch.randn(T, 96)
    if precision == "full":
        dense, tol = dense_full(ex), 1e-5
    else:
        # quantised pools compute in bf16 (the CPU kernels' activation dtype): bf16-level error
        dense, tol = dense_quantised(lambda e: (ex.w_gate[e], ex.w_up[e], ex.w_down[e]), precision), 2e-2
        ex.apply_plan(ExpertPlan([Copy(e, precision) for e in range(E)]))
    ref = reference(x, ids, w, dense)
    out = ex(x, ids, w)
    assert out.dtype == x.dtype
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, f"{precision}: relative error {err:.2e}"


@pytest.mark.parametrize("T", [1, 6, 40])  # mv, bf16 GEMM, fp32 GEMM on widened weights
def test_bf16_model_dtype(T):
    ex = random_experts(dtype=torch.bfloat16)
    ids, w = random_routing(T, 2, 4)
    x = torch.randn(T, 48).bfloat16()
    ref = reference(x, ids, w, dense_full(ex))
    out = ex(x, ids, w.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() / ref.abs().max() < 2e-2


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
    # int4: half a byte per input padded to the group of 64 (D = 96 -> 128), a bf16 scale and zero
    # per channel and group: gate/up 2I x (128 / 2 + 2 groups x 4), down D x (64 / 2 + 1 x 4)
    assert ex.weight_bytes() == E * (2 * I * (64 + 2 * 4) + D * (32 + 4))
    ex.apply_plan(ExpertPlan([Copy(e) for e in range(E)] + [Copy(0, "int8")]))
    assert ex.weight_bytes() == E * 3 * I * D * 4 + 3 * I * D + (2 * I + D) * 2
    with pytest.raises(ValueError, match="no copy of experts \\[3\\]"):
        ex.apply_plan(ExpertPlan([Copy(0), Copy(1), Copy(2)]))
    with pytest.raises(ValueError, match="invalid copies"):
        ex.apply_plan(ExpertPlan([Copy(e, "int3") for e in range(E)]))


# (hidden D, intermediate I): tiny-mixtral's and tiny-deepseek's experts, then shapes whose int4
# inputs are padded to the group or grouped by 32 instead of 64
STORED_SHAPES = [(256, 384), (256, 96), (48, 40), (96, 64), (100, 20), (64, 33)]


@pytest.mark.parametrize("hidden,inter", STORED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_budgeted_bytes_are_the_bytes_the_pools_store(hidden, inter, dtype):
    """`expert_bytes` (R&Q's budget, `Experts.copy_bytes`) against what each pool holds."""
    E = 3
    w13, w2 = torch.randn(E, 2 * inter, hidden).to(dtype), torch.randn(E, hidden, inter).to(dtype)
    itemsize = w13.element_size()
    for precision in ("full", "int8", "int4"):
        for group in (32, 128):
            pool = FullPool(w13, w2) if precision == "full" else build_pool(
                precision, list(range(E)), lambda e: (w13[e, :inter], w13[e, inter:], w2[e]), group, dtype, "cpu",
                inter, hidden)
            stored = pool_bytes(pool)
            assert stored == E * expert_bytes(hidden, inter, precision, itemsize, group), (precision, group)
    ex = Experts(w13[:, :inter].clone(), w13[:, inter:].clone(), w2.clone())
    for precision in ("full", "int8", "int4"):
        ex.apply_plan(ExpertPlan([Copy(e, precision) for e in range(E)] + [Copy(0, precision)]))
        assert ex.weight_bytes() == (E + 1) * expert_bytes(hidden, inter, precision, itemsize)
        assert ex.copy_bytes(precision) == expert_bytes(hidden, inter, precision, itemsize)


def test_int8_round_trip():
    w = torch.randn(3, 64, 80) * torch.rand(3, 64, 1) * 4
    w[0, 0] = 0  # an all-zero channel must not divide by zero
    qw = quant.quantize(w, "int8")
    assert qw.q.dtype == torch.int8 and qw.scales.dtype == torch.bfloat16 and qw.scales.shape == (3, 64)
    err = (quant.dequantize(qw) - w).abs()
    assert (err <= 0.5 * qw.scales.float()[..., None] * (1 + 1e-3) + 1e-30).all()
    assert err.max() / w.abs().max() < 1 / 200


@pytest.mark.parametrize("group,K", [(32, 256), (128, 256), (64, 72)])  # 72 inputs: padded to 128
def test_int4_round_trip_and_layout(group, K):
    w = torch.randn(2, 16, K) + torch.randn(2, 16, 1)  # offset channels: asymmetric matters
    qw = quant.quantize(w, "int4", group)
    KP = -(-K // group) * group
    assert qw.q.shape == (2, 16, KP // 2) and qw.scales.shape == (2, 16, KP // group, 2) and qw.group == group
    scale = qw.scales[..., 0].float().repeat_interleave(group, -1)[..., :K]
    err = (quant.dequantize(qw) - w).abs()
    assert (err <= 0.5 * scale * 1.01 + 1e-6).all()
    # byte j holds input 2j in its low nibble and 2j + 1 in its high nibble
    codes = torch.stack((qw.q & 15, qw.q >> 4), -1).flatten(-2)
    s, z = (qw.scales[..., i].float().repeat_interleave(group, -1) for i in (0, 1))
    assert torch.equal(((codes.float() - 8) * s + z)[..., :K], quant.dequantize(qw))


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


# --- storage: fill, base precision, what a plan keeps ------------------------------------------


def reader_of(ex, calls=None, as_bf16=False):
    """read(e) over copies of an unfilled Experts' weights, logging each expert read."""
    saved = [tuple(w[e].clone() for w in (ex.w_gate, ex.w_up, ex.w_down)) for e in range(ex.num_experts)]

    def read(e):
        if calls is not None:
            calls.append(e)
        return tuple(w.bfloat16() for w in saved[e]) if as_bf16 else saved[e]
    return read


def mixed_input(E=4, T=13, D=48):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(T, D, generator=g), torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)]),
            torch.rand(T, 2, generator=g))


@pytest.mark.parametrize("precision", ["full", "int8", "int4"])
def test_fill_equals_the_parameters_path(precision):
    """Filled in `precision` (one read per expert, in order), the experts compute what experts
    built from parameters compute under an all-`precision` plan, bit for bit."""
    ref = random_experts()
    calls = []
    ex = random_experts()
    ex.fill(reader_of(ref, calls), precision, group=32)
    assert calls == [0, 1, 2, 3] and ex.base_precision == precision
    ref.group = 32  # (the unfilled experts quantise their copies with the same group)
    ref.apply_plan(ExpertPlan([Copy(e, precision) for e in range(4)]))
    x, ids, w = mixed_input()
    assert torch.equal(ex(x, ids, w), ref(x, ids, w))
    if precision == "full":
        E, I, D = ex.shape
        assert ex.full_pool().w13.data_ptr() == ex.w_gate.data_ptr() and ex.w_gate.shape == (E, I, D)
        assert ex.resident_bytes() == ex.weight_bytes() == E * 3 * I * D * 4
    else:  # the parameters are empty: only the quantised pool is held
        assert ex.w_gate.numel() == ex.w_up.numel() == ex.w_down.numel() == 0
        assert ex.resident_bytes() == ex.weight_bytes() == 4 * ex.copy_bytes("full")
        assert ex.copy_bytes("full") == expert_bytes(48, 40, precision, 4, 32)


def test_fill_takes_a_quantised_checkpoint_as_it_is():
    """QWeights read in the base precision are stacked as given (gate rows, then up rows)."""
    ref = random_experts()
    qws = {e: [quant.quantize(w[e], "int4", 32) for w in (ref.w_gate, ref.w_up, ref.w_down)] for e in range(4)}
    ex = random_experts()
    ex.fill(lambda e: qws[e], "int4", 32)
    held = ex.copies().pools["int4"]
    for e in range(4):
        gate, up, down = qws[e]
        assert torch.equal(held.w13.q[e], torch.cat((gate.q, up.q))) and torch.equal(held.w2.q[e], down.q)
        assert torch.equal(held.w13.scales[e], torch.cat((gate.scales, up.scales)))
    # int8 weights read into int4 experts are converted (dequantised, then quantised)
    int8 = {e: [quant.quantize(w[e], "int8") for w in (ref.w_gate, ref.w_up, ref.w_down)] for e in range(4)}
    ex.fill(lambda e: int8[e], "int4", 32)
    want = quant.quantize(quant.dequantize(int8[2][2]), "int4", 32)
    assert torch.equal(ex.copies().pools["int4"].w2.q[2], want.q)


def test_fill_errors_are_one_line():
    ex = random_experts()
    read = reader_of(random_experts())
    q = {e: [quant.quantize(w, "int4", 64) for w in read(e)] for e in range(4)}
    cases = [
        (lambda: ex.fill(read, "int3"), ValueError, "unknown expert precision 'int3'; valid: full, int8, int4"),
        (lambda: ex.fill(read, "int4", 48), ValueError, "int4 group must be one of 32, 64, 128, got 48"),
        (lambda: ex.fill("weights.safetensors"), TypeError,
         "Experts.fill: read must be a function of the expert index, not str"),
        (lambda: ex.fill(lambda e: read(e)[::-1]), ValueError,
         "expert 0: gate, up, down are (48, 40), (40, 48), (40, 48); want (40, 48), (40, 48), (48, 40)"),
        (lambda: ex.fill(lambda e: (quant.quantize(read(e)[0], "int8"), *read(e)[1:]), "int8"), ValueError,
         "expert 0: gate is int8 (group 0) but up is full (group 0); gate and up must share one precision and group"),
        (lambda: ex.fill(lambda e: q[e], "int4", 32), ValueError,
         "int4 weights of group 64 given to experts stored with group 32 (requantising int4 would lose precision)"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind) as e:
            call()
        assert str(e.value) == message


def test_fill_on_meta_parameters_allocates_only_the_pool():
    """The loader builds experts on the meta device and fills the quantised ones directly."""
    ref = random_experts()
    with torch.device("meta"):
        ex = random_experts()
    ex.fill(reader_of(ref), "int8")
    assert ex.w_gate.device.type == "cpu" and ex.w_gate.numel() == 0
    ref.apply_plan(ExpertPlan([Copy(e, "int8") for e in range(4)]))
    x, ids, w = mixed_input()
    assert torch.equal(ex(x, ids, w), ref(x, ids, w))


def test_a_quantised_base_serves_full_and_its_own_precision_from_one_row():
    """With an int8 base, "full" and "int8" copies of an expert are the base row; an int4 copy is
    built from what `read` gives (the checkpoint), not from the int8 codes."""
    ref = random_experts()
    calls = []
    ex = random_experts()
    ex.fill(reader_of(ref, calls), "int8")
    calls.clear()
    ex.apply_plan(ExpertPlan([Copy(0), Copy(1, "int8"), Copy(2), Copy(3, "int4"), Copy(0, "int8")]))
    assert calls == [3]  # only the int4 copy reads; expert 3's int8 row is freed
    assert ex.copies().where == (("int8", 0), ("int8", 1), ("int8", 2), ("int4", 0), ("int8", 0))
    assert ex.resident_bytes() == 3 * ex.copy_bytes("int8") + ex.copy_bytes("int4")
    assert ex.weight_bytes() == 4 * ex.copy_bytes("int8") + ex.copy_bytes("int4")
    ref.apply_plan(ExpertPlan([Copy(0, "int8"), Copy(1, "int8"), Copy(2, "int8"), Copy(3, "int4")]))
    x, ids, w = mixed_input()
    assert torch.equal(ex(x, ids, w), ref(x, ids, w))  # the int4 copy equals one quantised from the source
    gate, up, down = ex.expert_weights(3)  # freed: read back, in the base precision
    assert torch.equal(down, quant.dequantize(quant.quantize(ref.w_down[3], "int8")))


def rnq_plan_for(ex):
    from tinymoe.routing.rnq import rnq_plan
    E = ex.num_experts
    load, importance = [float(10 * (e == 0) + 1) for e in range(E)], list(range(E))
    return rnq_plan(load, importance, {p: ex.copy_bytes(p) for p in ("full", "int8", "int4")})


def test_an_rnq_plan_holds_only_its_copies_and_the_default_plan_reads_the_rest_back(tiny_mixtral):
    """R&Q memory: after applying an R&Q plan (routing/rnq.py) to a model whose experts were
    filled, the weights held are at most the plan's accounted bytes (overhead: none; each
    quantised copy of an expert counted once per copy but held once); the freed experts' full
    weights are read again for the default plan, which then computes exactly what it did."""
    model = tinymoe.load_model(tiny_mixtral)
    plain = tinymoe.load_model(tiny_mixtral)  # filled by the loader, reading the checkpoint back
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    calls, plans = {}, {}
    for block in model.moe_blocks():
        calls[block.ctx.layer] = []
        block.experts.fill(reader_of(block.experts, calls[block.ctx.layer]))
    with torch.no_grad():
        before = model(ids)
        for block, other in zip(model.moe_blocks(), plain.moe_blocks()):
            plan = plans[block.ctx.layer] = rnq_plan_for(block.experts)
            assert {c.precision for c in plan.copies} == {"full", "int8", "int4"}
            block.experts.apply_plan(plan)
            other.experts.apply_plan(plan)
            ex = block.experts
            assert ex.w_gate.numel() == 0  # the [E, 2I, D] parameters are gone
            full = {c.expert for c in plan.copies if c.precision == "full"}
            held = {p: len({c.expert for c in plan.copies if c.precision == p}) for p in ("int8", "int4")}
            assert ex.resident_bytes() == (len(full) * ex.copy_bytes("full") + held["int8"] * ex.copy_bytes("int8")
                                           + held["int4"] * ex.copy_bytes("int4"))
            assert ex.resident_bytes() <= ex.weight_bytes() == other.experts.weight_bytes()
            assert other.experts.resident_bytes() == ex.resident_bytes()  # a loaded bf16 model frees too
            calls[block.ctx.layer].clear()
        assert torch.equal(model(ids), plain(ids))  # the same copies, from the compacted storage
        for block in model.moe_blocks():
            block.experts.apply_plan(ExpertPlan.default(block.experts.num_experts))
            freed = sorted({c.expert for c in plans[block.ctx.layer].copies if c.precision == "int4"})
            assert sorted(calls[block.ctx.layer]) == freed  # re-read: exactly the freed experts
            assert block.experts.resident_bytes() == block.experts.weight_bytes()
        assert torch.equal(model(ids), before)
