"""kernels.moe_experts, the one op that computes a layer's experts: its torch twin against float64
(with the quantisers' codes dequantised here, not by the op), the native CPU implementation and
the Triton one (in the interpreter) against the twin, the observer it reports to, its input
errors; and calibration's statistics, collected from the model's own forward through that
observer, against a straightforward loop of their definition."""
import pytest
import torch
import torch.nn.functional as F

from tinymoe import kernels
from tinymoe.experts import Copy, ExpertPlan, Experts
from tinymoe.experts.pools import FullPool
from tinymoe.kernels import ExpertCopies, MoEWeights, backend, cpu_linear, moe_experts, quant

needs_native = pytest.mark.skipif(cpu_linear.native() is None, reason="no C++ compiler or no AVX2 here")

PLANS = {  # name -> copies of E = 4 experts
    "full": [Copy(e) for e in range(4)],
    "replicas": [Copy(e) for e in range(4)] + [Copy(1), Copy(3), Copy(1)],
    "int8": [Copy(e, "int8") for e in range(4)],
    "int4": [Copy(e, "int4") for e in range(4)],
    "mixed": [Copy(0), Copy(1, "int8"), Copy(2), Copy(3, "int4"), Copy(2, "int8"), Copy(0, "int4")],
}


def layer(plan, I=40, D=48, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = Experts(*((torch.randn(4, I, D, generator=g) / D ** 0.5).to(dtype) for _ in range(2)),
                 (torch.randn(4, D, I, generator=g) / I ** 0.5).to(dtype))
    ex.apply_plan(ExpertPlan(PLANS[plan]))
    return ex


def routed(ex, T, k=2, dtype=torch.bfloat16, seed=1):
    """x [T, D], the plan's copies for random distinct experts per token, weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, ex.w_gate.shape[2], generator=g).to(dtype)
    ids = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    return x, ex.physical_ids(ids), torch.rand(T, k, generator=g).to(dtype)


def dequantized(qw):
    """float64 values of a QWeight, decoded here from its documented layout (not by the op)."""
    if qw.precision == "int8":
        return qw.q.double() * qw.scales.double()[:, None]
    codes = torch.stack((qw.q & 15, qw.q >> 4), -1).flatten(-2).double()  # input 2j low nibble, 2j+1 high
    scale, zero = (qw.scales[..., i].double().repeat_interleave(qw.group, -1) for i in (0, 1))
    return ((codes - 8) * scale + zero)[:, :qw.cols]


def dense_copy(ex, copy):
    """float64 (w13 [2I, D], w2 [D, I]) of a physical copy, from the quantisers' own codes."""
    c = ex.plan.copies[copy]
    w13, w2 = ex.full_pool().w13[c.expert], ex.w_down[c.expert]
    if c.precision == "full":
        return w13.double(), w2.double()
    return tuple(dequantized(quant.quantize(w, c.precision, ex.group)) for w in (w13, w2))


def reference(ex, x, copy_ids, weights):
    """float64, token by token and slot by slot, weights rounded to x's dtype as the op takes them."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    I = ex.w_gate.shape[1]
    for t in range(copy_ids.shape[0]):
        for s in range(copy_ids.shape[1]):
            w13, w2 = dense_copy(ex, int(copy_ids[t, s]))
            h = w13 @ x[t].double()
            out[t] += weights[t, s].double() * (w2 @ (F.silu(h[:I]) * h[I:]))
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5])
def test_torch_twin_matches_float64(plan, dtype, T):
    ex = layer(plan, dtype=dtype)
    x, copy_ids, w = routed(ex, T, dtype=dtype)
    out = moe_experts.torch(x, copy_ids, w, ex.copies())
    assert out.dtype == dtype
    # fp32 throughout, one rounding to x's dtype; quantised copies dequantised exactly
    assert rel_err(out, reference(ex, x, copy_ids, w)) < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("plan", ["full", "replicas"])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_native_equals_the_twin_bit_for_bit_in_fp32(plan, T):
    """fp32 full-precision copies: the CPU implementation's arithmetic is the twin's."""
    ex = layer(plan, I=96, D=128, dtype=torch.float32)
    x, copy_ids, w = routed(ex, T, dtype=torch.float32)
    with kernels.use_backend("torch"):
        out = moe_experts(x, copy_ids, w, ex.copies())
    assert torch.equal(out, moe_experts.torch(x, copy_ids, w, ex.copies()))


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("T", [1, 6, 40])
def test_native_bf16_within_bf16_roundings_of_the_twin(plan, T, bf16_cpu):
    ex = layer(plan)
    x, copy_ids, w = routed(ex, T)
    native = moe_experts.native(x, copy_ids, w, ex.copies())
    assert native is not NotImplemented and native.dtype == torch.bfloat16
    # the CPU kernels round the intermediate, each copy's output and each partial sum to bf16
    assert rel_err(native, moe_experts.torch(x, copy_ids, w, ex.copies())) < 2e-2


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 9])
def test_triton_in_the_interpreter_matches_the_twin(plan, dtype, T):
    if not backend.interpreting():
        pytest.fail("Triton's interpreter is off in this process")
    ex = layer(plan, I=32, D=64, dtype=dtype)
    x, copy_ids, w = routed(ex, T, dtype=dtype)
    with kernels.use_backend("triton"):
        out = moe_experts(x, copy_ids, w, ex.copies())
    # both fp32 on the same operands; the sums over slots run in another order
    torch.testing.assert_close(out, moe_experts.torch(x, copy_ids, w, ex.copies()),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("plan", ["full", "mixed"])
def test_no_assignments_give_zeros(backend_name, plan):
    ex = layer(plan)
    x, copy_ids, w = routed(ex, 0)
    for impl in (moe_experts.torch, moe_experts.native):
        out = impl(x, copy_ids, w, ex.copies())
        assert out.shape == (0, 48) and out.dtype == x.dtype
    with kernels.use_backend(backend_name):
        out = moe_experts(torch.randn(3, 48).bfloat16(), copy_ids.new_zeros(3, 0), w.new_zeros(3, 0),
                          ex.copies())  # k = 0
    assert torch.equal(out, torch.zeros(3, 48, dtype=x.dtype))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_the_observer_sees_each_active_copy_once_and_runs_the_twin(backend_name):
    ex = layer("mixed", dtype=torch.float32)
    x, copy_ids, w = routed(ex, 9, dtype=torch.float32)
    seen = {}
    with kernels.use_backend(backend_name):
        out = moe_experts(x, copy_ids, w, ex.copies(), lambda c, xs, h: seen.setdefault(c, []).append((xs, h)))
    assert moe_experts.native(x, copy_ids, w, ex.copies(), print) is NotImplemented
    assert torch.equal(out, moe_experts.torch(x, copy_ids, w, ex.copies()))
    assert sorted(seen) == copy_ids.unique().tolist()
    for c, [(xs, h)] in seen.items():
        rows = (copy_ids == c).any(-1)
        assert torch.equal(xs, x[rows])
        w13, _ = dense_copy(ex, c)
        g = xs.double() @ w13.T
        torch.testing.assert_close(h.double(), F.silu(g[:, :40]) * g[:, 40:], rtol=1e-5, atol=1e-6)


def test_experts_observer_names_logical_experts():
    ex = layer("replicas", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x, ids = torch.randn(12, 48, generator=g), torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(12)])
    seen = []
    out = ex(x, ids, torch.rand(12, 2, generator=g), lambda e, xs, h: seen.append((e, xs.shape[0])))
    assert out.shape == (12, 48)
    per_expert = {}
    for e, n in seen:
        per_expert[e] = per_expert.get(e, 0) + n
    assert per_expert == {e: int((ids == e).sum()) for e in ids.unique().tolist()}
    assert len(seen) > len(per_expert)  # replicas: an expert reported once per active copy


def test_bad_inputs_are_one_line_errors():
    ex = layer("mixed")
    copies = ex.copies()
    x, copy_ids, w = routed(ex, 3)
    for impl in (moe_experts.torch, moe_experts.native):
        with pytest.raises(ValueError, match=r"^moe_experts: x is \(3, 47\), want \[T, 48\]$"):
            impl(x[:, :47], copy_ids, w, copies)
        with pytest.raises(ValueError, match=r"^moe_experts: copy_ids \(3, 2\) and weights \(3, 1\) must both "
                                             r"be \[T, k\] with T = 3$"):
            impl(x, copy_ids, w[:, :1], copies)
        with pytest.raises(TypeError, match=r"^moe_experts: copy_ids must be integers, not torch.float32$"):
            impl(x, copy_ids.float(), w, copies)
        with pytest.raises(TypeError, match=r"^moe_experts: copies must be an ExpertCopies, not dict$"):
            impl(x, copy_ids, w, {})
        for bad in (6, -1):
            ids = copy_ids.clone()
            ids[1, 1] = bad
            for rows in (slice(0, 3), slice(1, 2)):  # one token: the decode path checks too
                low, high = int(ids[rows].min()), int(ids[rows].max())
                with pytest.raises(ValueError, match=rf"^moe_experts: copy ids in {low}\.\.{high}, outside 0\.\.5$"):
                    impl(x[rows], ids[rows], w[rows], copies)


def test_bad_copies_are_one_line_errors():
    full = FullPool(torch.zeros(2, 8, 4), torch.zeros(2, 4, 4)).kernel_weights()
    with pytest.raises(ValueError, match=r"^expert pool 'int3' holds 'full' weights; valid pools: full, int8, int4$"):
        ExpertCopies({"int3": full}, [("int3", 0)])
    with pytest.raises(ValueError, match=r"^expert copy 1 is in pool 'int8', which is not given$"):
        ExpertCopies({"full": full}, [("full", 0), ("int8", 0)])
    with pytest.raises(ValueError, match=r"^expert copy 0: row 2 outside pool 'full' of 2 rows$"):
        ExpertCopies({"full": full}, [("full", 2)])
    other = MoEWeights("full", torch.zeros(2, 8, 5), torch.zeros(2, 5, 4), 4, 5)
    with pytest.raises(ValueError, match=r"^expert pools disagree on \(hidden, intermediate\) sizes: "
                                         r"\[\(4, 4\), \(5, 4\)\]$"):
        ExpertCopies({"full": full, "int8": other._replace(precision="int8")}, [("full", 0)])


def test_copies_follow_plans_and_storage():
    ex = layer("full", dtype=torch.float32)
    first = ex.copies()
    assert ex.copies() is first and first.full_rows == [0, 1, 2, 3] and ex.full_copy_rows == [0, 1, 2, 3]
    ex.apply_plan(ExpertPlan(PLANS["mixed"]))
    mixed = ex.copies()
    assert mixed is not first and mixed.full_rows is None and set(mixed.pools) == {"full", "int8", "int4"}
    # a pool's rows hold its experts in increasing order
    assert mixed.where == (("full", 0), ("int8", 0), ("full", 2), ("int4", 1), ("int8", 1), ("int4", 0))
    ex.to(torch.float64)  # replaces the parameters and the quantised pools' buffers
    moved = ex.copies()
    assert moved is not mixed and moved.pools["full"].w13.dtype == torch.float64
    assert moved.pools["int8"].w13.scales is ex.pools["int8"].s13
    assert mixed.pools["int8"].w13.scales is not moved.pools["int8"].w13.scales
    # the formats' scales stay bf16 whatever the model's dtype
    assert {moved.pools[p].w13.scales.dtype for p in ("int8", "int4")} == {torch.bfloat16}


# --- calibration: statistics from the model's own forward (MoEBlock.observer -> the op) -----------


def straightforward_statistics(model, rows, batch):
    """Per MoE layer, by definition: the block's input of every batch (a forward pre-hook), top-k
    of the softmax of its gate, and per expert the inputs routed to it and their SwiGLU
    activations in float64."""
    inputs = {b.ctx.layer: [] for b in model.moe_blocks()}
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs[m.ctx.layer].append(a[0].reshape(-1, a[0].shape[-1])))
             for b in model.moe_blocks()]
    try:
        with torch.no_grad():
            for s in range(0, rows.shape[0], batch):
                model(rows[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    stats = {}
    for b in model.moe_blocks():
        x32 = torch.cat(inputs[b.ctx.layer])
        x = x32.double()
        E, k = b.ctx.rule.num_experts, b.ctx.rule.top_k
        # the choice in the model's fp32 (a float64 gate could break near-ties the other way)
        probs = torch.softmax(F.linear(x32, b.gate.weight), -1)
        top = probs.topk(k, -1)
        load = torch.zeros(E, dtype=torch.float64)
        importance = torch.zeros(E, dtype=torch.float64)
        for e in range(E):
            xe = x[(top.indices == e).any(-1)]
            load[e] = xe.shape[0]
            wg, wu, wd = (w[e].double() for w in (b.experts.w_gate, b.experts.w_up, b.experts.w_down))
            he = F.silu(xe @ wg.T) * (xe @ wu.T)
            importance[e] = ((wg.abs() + wu.abs()) * xe.norm(dim=0)).sum() + (wd.abs() * he.norm(dim=0)).sum()
        mass = top.values.double().sum(-1)
        stats[b.ctx.layer] = {"load": load, "importance": importance,
                              "mass_quantiles": torch.quantile(mass, torch.linspace(0, 1, 101, dtype=torch.float64))}
    return stats


def test_calibration_statistics_equal_a_straightforward_loop(tiny_checkpoint):
    import tinymoe
    from tinymoe.routing import install
    from tinymoe.routing.calibrate import calibrate
    model = tinymoe.load_model(tiny_checkpoint, dtype="float32")
    install(model, "balanced")  # calibration routes by the model's own top-k whatever is installed
    seq_len, batch = 16, 3
    tokens = torch.randint(0, model.config.vocab_size, (7 * seq_len,), generator=torch.Generator().manual_seed(0))
    calib = calibrate(model, tokens, seq_len=seq_len, batch=batch, proto_steps=0)
    assert all(b.router.name == "balanced" and b.observer is None for b in model.moe_blocks())  # restored
    install(model, "topk")
    want = straightforward_statistics(model, tokens.view(7, seq_len), batch)
    assert sorted(calib.layers) == sorted(want)
    for layer, stats in want.items():
        got = calib.layer(layer)
        assert torch.equal(got["load"].double(), stats["load"])
        torch.testing.assert_close(got["importance"].double(), stats["importance"], rtol=1e-5, atol=0)
        torch.testing.assert_close(got["mass_quantiles"].double(), stats["mass_quantiles"], rtol=1e-5, atol=1e-6)


@needs_native
def test_the_one_call_decode_step_leaves_observed_models_to_the_per_op_path(tiny_mixtral):
    import tinymoe
    from tinymoe.models import native_decode
    model = tinymoe.load_model(tiny_mixtral, dtype="bfloat16")
    cfg = model.config
    cache = torch.zeros(cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim, dtype=torch.bfloat16)
    assert native_decode.covers(model, cache)
    model.moe_blocks()[1].observer = object()
    assert not native_decode.covers(model, cache)
