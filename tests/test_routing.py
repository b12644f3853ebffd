"""Routers and balance metrics on crafted gate logits (docs/routing.md, sections 1-8)."""
import math

import pytest
import torch

from tinymoe.experts.plan import Copy, ExpertPlan
from tinymoe.experts.quant import expert_bytes
from tinymoe.routing import GateRule, RouteContext, make_router
from tinymoe.routing import metrics
from tinymoe.routing.laser import candidate_pools, greedy_fast, greedy_reference, top_mass
from tinymoe.routing.rnq import plan_bytes, rnq_plan


def ctx_for(E, k, renormalize=True):
    return RouteContext(0, 1, GateRule(E, k, renormalize))


def load_of(ids, E):
    return torch.bincount(ids.reshape(-1), minlength=E)


def test_topk_is_each_family_rule():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    # Mixtral: softmax over the two chosen logits.
    ids, w = make_router("topk").route(logits, None, ctx_for(8, 2, True))
    two = logits.topk(2, dim=-1)
    assert torch.equal(ids, two.indices)
    torch.testing.assert_close(w, torch.softmax(two.values, -1))
    # DeepSeek-MoE: the full softmax's probabilities of the chosen six, not renormalised.
    ids, w = make_router("topk").route(logits, None, ctx_for(8, 6, False))
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, logits.topk(6, -1).indices))


def test_bad_router_name_and_option_are_one_line_errors():
    with pytest.raises(ValueError, match="valid routers: .*laser"):
        make_router("nope")
    with pytest.raises(ValueError, match="valid options: .*t_fix"):
        make_router("laser", tfix=0.1)


def crafted(rows):
    return torch.tensor(rows, dtype=torch.float64).log().float()


def test_laser_hand_worked_example():
    # E=4, k=2, eps_high=0.7, t_fix=0.3, c=4. Worked by hand, token by token:
    logits = crafted([
        [0.50, 0.30, 0.10, 0.10],  # M=0.80 peaked: top-2 {0,1}; L=[1,1,0,0]
        [0.32, 0.28, 0.25, 0.15],  # M=0.60 flat, pool all: least loaded {2,3}; L=[1,1,1,1]
        [0.34, 0.30, 0.26, 0.10],  # flat, 0.10 < 0.3*0.34 drops 3; all L=1, by score {0,1}
        [0.05, 0.40, 0.35, 0.20],  # M=0.75 peaked: {1,2}; L=[2,3,2,1]
        [0.30, 0.05, 0.33, 0.32],  # flat, drops 1; 3 (L=1) then 2 over 0 by score; L=[2,3,3,2]
        [0.27, 0.26, 0.25, 0.22],  # flat: L ties 0 and 3 at 2, 0 first by score
    ])
    expected = [{0, 1}, {2, 3}, {0, 1}, {1, 2}, {2, 3}, {0, 3}]
    ctx = ctx_for(4, 2)
    for exact in (True, False):
        router = make_router("laser", eps_high=0.7, t_fix=0.3, c=4, exact=exact)
        ids, w = router.route(logits, None, ctx)
        assert [set(r) for r in ids.tolist()] == expected
        probs = torch.softmax(logits.float(), -1)
        torch.testing.assert_close(w, ctx.rule.weights(probs, ids))
    assert ctx.state["flat"] == 8 and ctx.state["tokens"] == 12
    # t_fix keeps only the best expert, so the pool refills by score to k: loads cannot pull away.
    router = make_router("laser", eps_high=1.0, t_fix=0.9, exact=True)
    ids, _ = router.route(crafted([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]), None, ctx_for(4, 2))
    assert [set(r) for r in ids.tolist()] == [{3, 2}, {3, 2}]


def test_laser_equals_topk_at_one_token_and_for_peaked_scores():
    logits = torch.randn(1, 8)
    a = make_router("laser", eps_high=0.99).route(logits, None, ctx_for(8, 2))[0]
    assert set(a[0].tolist()) == set(logits.topk(2).indices[0].tolist())
    logits = torch.randn(64, 8)
    a = make_router("laser", eps_high=0.0).route(logits, None, ctx_for(8, 2))[0]
    assert torch.equal(a, logits.topk(2, -1).indices)


@pytest.mark.parametrize("eps_high", [None, 0.0, 0.5, 1.0])
def test_laser_one_token_shortcut_equals_the_scan(eps_high):
    # one token (batch-1 decode) through the shortcut against the general scan's functions on the
    # same token; bf16 logits and a forced tie make tied scores common
    g = torch.Generator().manual_seed(0)
    for exact in (True, False):
        ctx = ctx_for(8, 2)
        router = make_router("laser", eps_high=eps_high, t_fix=0.3, c=4, exact=exact)
        flat_count = 0
        for _ in range(200):
            logits = (torch.randn(1, 8, generator=g) * 2).bfloat16().float()
            logits[0, 3] = logits[0, 5]
            ids, w = router.route(logits, None, ctx)
            probs = ctx.rule.probs(logits)
            mass = top_mass(probs, 2)
            flat = mass < router.threshold(mass)
            pool, valid = candidate_pools(probs, 2, 4, 0.3)
            scan = greedy_reference if exact else greedy_fast
            ref = scan(pool, valid, flat, 2, 8)
            assert torch.equal(ids, ref) and torch.equal(w, ctx.rule.weights(probs, ref))
            flat_count += int(flat.sum())
        assert ctx.state["flat"] == flat_count and ctx.state["tokens"] == 200
        # both branches seen where they can be: never flat without eps_high or at 0, always at 1
        assert flat_count == {None: 0, 0.0: 0, 1.0: 200}[eps_high] if eps_high != 0.5 else 0 < flat_count < 200


@pytest.mark.parametrize("E,k", [(8, 2), (64, 6), (128, 8)])
def test_fast_laser_within_two_percent_of_reference(E, k):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(2048, E, generator=g) * (0.5 + seed * 0.75) + torch.randn(E, generator=g)
        probs = torch.softmax(logits, -1)
        mass = top_mass(probs, k)
        flat = mass < mass.median()
        pool, valid = candidate_pools(probs, k, min(E, 2 * k), 0.3)
        ref = metrics.imbalance(load_of(greedy_reference(pool, valid, flat, k, E), E))
        fast = metrics.imbalance(load_of(greedy_fast(pool, valid, flat, k, E), E))
        assert abs(fast / ref - 1) <= 0.02, (seed, fast, ref)
        assert ref < metrics.imbalance(load_of(probs.topk(k).indices, E))


def test_balanced_reaches_perfect_balance_and_random_is_uniform():
    logits = torch.randn(96, 8) + torch.tensor([4.0, 3, 0, 0, 0, 0, 0, 0])  # skewed gate
    ids, _ = make_router("balanced").route(logits, None, ctx_for(8, 2))
    assert abs(metrics.imbalance(load_of(ids, 8)) - 1) <= 0.01
    assert all(len(set(r)) == 2 for r in ids.tolist())
    ids, _ = make_router("random", seed=1).route(torch.randn(4000, 8), None, ctx_for(8, 2))
    assert metrics.imbalance(load_of(ids, 8)) < 1.1
    assert all(len(set(r)) == 2 for r in ids.tolist())


def test_bias_update_moves_load_away_from_the_hot_expert():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=g) * 0.3 + torch.tensor([1.0, 0.5, 0, 0, 0, 0, 0, 0])
    ctx, router = ctx_for(8, 2), make_router("bias", gamma=0.02)
    first, _ = router.route(logits, None, ctx)
    assert ctx.state["bias"][0] < 0 < ctx.state["bias"][7]
    for _ in range(20):
        ids, w = router.route(logits, None, ctx)
    assert load_of(ids, 8)[0] < load_of(first, 8)[0]
    assert metrics.imbalance(load_of(ids, 8)) < metrics.imbalance(load_of(first, 8))
    torch.testing.assert_close(w, ctx.rule.weights(torch.softmax(logits, -1), ids))  # unbiased p


def test_metric_functions_match_hand_values():
    assert metrics.gini(torch.tensor([4, 0, 0, 0])) == pytest.approx(0.75)
    assert metrics.gini(torch.tensor([2, 2, 2, 2])) == 0
    assert metrics.imbalance(torch.tensor([4, 0, 0, 0])) == pytest.approx(4.0)
    assert metrics.imbalance(torch.tensor([3, 1, 2, 2])) == pytest.approx(1.5)
    assert metrics.minmax(torch.tensor([1, 2, 4])) == pytest.approx(0.25)
    assert metrics.cv(torch.tensor([1.0, 3.0])) == pytest.approx(0.5)
    # 4 experts on 2 devices, contiguous: [5+1, 1+1] -> I_dev = 6 / 4
    dev = metrics.placement(None, 4, 2)
    assert dev.tolist() == [0, 0, 1, 1]
    assert metrics.imbalance(metrics.device_loads(torch.tensor([5, 1, 1, 1]), dev, 2)) == 1.5
    # Balanced packing, two copies a device: 5 -> d0, 3 -> d1, 1 -> d1, then d1 is full: 1 -> d0.
    replicas = ExpertPlan([Copy(0), Copy(1), Copy(2), Copy(0, "int8")])
    assert metrics.placement(replicas, 3, 2, torch.tensor([5.0, 1, 1, 3])).tolist() == [0, 1, 0, 1]
    # alpha * tokens + beta * active, on the slowest device.
    assert metrics.ep_step_time(torch.tensor([5, 1, 0, 1]), dev, 2, 2.0, 10.0) == 2 * 6 + 10 * 2


def test_physical_loads_follow_the_dispatch_rule():
    plan = ExpertPlan([Copy(0, "full"), Copy(1, "int4"), Copy(2), Copy(0, "int8"), Copy(0, "int8")])
    ids = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0, 1, 0])  # 7 on expert 0: full copy gets the extra one
    sim = [0] * 5
    for e in ids.tolist():  # the rule itself, one assignment at a time
        cands = plan.copies_of(e)
        best = min(cands, key=lambda i: (sim[i], plan.copies[i].precision != "full", i))
        sim[best] += 1
    assert metrics.physical_loads(load_of(ids, 3), plan).tolist() == sim == [3, 2, 1, 2, 2]


def test_rnq_plan_respects_the_byte_budget_and_reduces_to_topk_without_replicas():
    g = torch.Generator().manual_seed(0)
    bytes_of = {p: expert_bytes(64, 96, p, 2) for p in ("full", "int8", "int4")}
    for trial in range(20):
        E = [8, 16, 64][trial % 3]
        load = torch.rand(E, generator=g) ** 4 * 1000
        importance = torch.rand(E, generator=g)
        for replicas in (None, 1, 3, 100):
            plan = rnq_plan(load, importance, bytes_of, "int8", "int4", replicas)
            assert plan_bytes(plan, bytes_of) <= E * bytes_of["full"]
            assert [c.expert for c in plan.copies[:E]] == list(range(E))
            assert all(c.precision == "full" for c in plan.copies if len(plan.copies_of(c.expert)) > 1
                       and plan.copies.index(c) == c.expert)  # replicated experts stay full
        heavy = int(load.argmax())
        assert len(rnq_plan(load, importance, bytes_of, replicas=1).copies_of(heavy)) == 2
    plan = rnq_plan(load, importance, bytes_of, replicas=0)
    assert plan == ExpertPlan.default(E)
    ids = torch.softmax(torch.randn(256, E) + torch.randn(E), -1).topk(6).indices
    assert metrics.imbalance(metrics.physical_loads(load_of(ids, E), plan)) == \
        metrics.imbalance(load_of(ids, E))
    # The replica takes half of the hot expert's assignments.
    plan = rnq_plan(torch.tensor([10.0, 1, 1, 1]), torch.ones(4), bytes_of, replicas=1)
    phys = metrics.physical_loads(torch.tensor([10, 2, 2, 2]), plan)
    assert phys.tolist() == [5, 2, 2, 2, 5]
    assert math.isclose(metrics.imbalance(phys), 5 / (16 / 5))


def test_prototype_router_post_hoc_matches_a_trained_prototype_gate():
    from types import SimpleNamespace
    from tinymoe.models.prototype_gate import PrototypeGate
    torch.manual_seed(0)
    gate = PrototypeGate(32, 8, 16, temperature=0.2)
    with torch.no_grad():
        gate.prototypes.normal_()
        gate.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(40, 32)
    ctx = ctx_for(8, 2)
    calib = {"proto.norm.weight": gate.norm.weight, "proto.norm.bias": gate.norm.bias,
             "proto.encoder.weight": gate.encoder.weight, "proto.encoder.bias": gate.encoder.bias,
             "proto.prototypes": gate.prototypes, "proto.temperature": torch.tensor(0.2)}
    post_hoc = make_router("prototype", weights="prototype")
    post_hoc.attach(SimpleNamespace(gate=torch.nn.Linear(32, 8, bias=False), ctx=ctx), calib)
    native = make_router("prototype")
    native.attach(SimpleNamespace(gate=gate, ctx=ctx), None)
    with torch.no_grad():
        logits = gate(x)
        a_ids, a_w = post_hoc.route(torch.randn(40, 8), x, ctx)  # the linear gate's logits are unused
        b_ids, b_w = native.route(logits, x, ctx)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w, b_w)  # softmax over the chosen s / tau == the Mixtral rule
    with pytest.raises(ValueError, match="calibrate"):
        make_router("prototype").attach(SimpleNamespace(gate=torch.nn.Linear(32, 8), ctx=ctx), None)


def test_router_without_options_says_so():
    with pytest.raises(ValueError, match="valid options: none"):
        make_router("balanced", seed=1)


# --- an expert plan over any base router (`--router laser --plan rnq`, docs/routing.md, section 5) ---


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory):
    """The embedded tiny-mixtral, calibrated on a slice of its held-out text, with LASER's loads
    (file saved too)."""
    import tinymoe
    from tinymoe.evaluation import read_tokens
    from tinymoe.routing.calibrate import calibrate
    from tinymoe.weights import ASSETS
    data = ASSETS / "data" / "heldout.txt"
    model = tinymoe.load_model("tiny", dtype="float32")
    tokens = read_tokens(tinymoe.load_tokenizer("tiny"), data)
    calib = calibrate(model, tokens[:4096], seq_len=64, proto_steps=0, routers=["laser"])
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    calib.save(path)
    return model, calib, path, data, tokens


def test_laser_with_rnq_plan_keeps_laser_choice_on_the_plan_copies(tiny_calibrated):
    from tinymoe.routing import install
    from tinymoe.routing.laser import Laser
    from tinymoe.routing.rnq import ReplicateQuantize
    model, calib, _, _, tokens = tiny_calibrated
    x = tokens[5000:5512].view(8, 64)
    seen = {}
    install(model, "laser", calib, plan="rnq", t_fix=0.5, q=0.25, c=3)
    for block in model.moe_blocks():
        def spy(logits, hidden, ctx, route=block.router.route):
            ids, w = route(logits, hidden, ctx)
            seen[ctx.layer] = (logits, ids, w)
            return ids, w
        block.router.route = spy
    with torch.no_grad():
        model(x)
    moved = 0
    for block in model.moe_blocks():
        router, plan, E = block.router, block.ctx.state["plan"], block.ctx.rule.num_experts
        assert isinstance(router, ReplicateQuantize) and isinstance(router.base, Laser)
        assert (router.base.t_fix, router.base.q, router.base.c) == (0.5, 0.25, 3)
        assert len(plan.copies) > E and block.ctx.state["plan_bytes"] <= block.ctx.state["budget_bytes"]
        logits, ids, w = seen[block.ctx.layer]
        alone = make_router("laser", t_fix=0.5, q=0.25, c=3)  # LASER alone, same options and layer
        alone.attach(block, calib.layer(block.ctx.layer))
        a_ids, a_w = alone.route(logits, None, RouteContext(block.ctx.layer, 1, block.ctx.rule))
        assert torch.equal(ids, a_ids)
        torch.testing.assert_close(w, a_w)
        moved += int((ids.sort(-1).values != logits.topk(2, -1).indices.sort(-1).values).any(-1).sum())
        # physical copies serve their logical expert, split by the dispatch rule
        phys = block.experts.last_physical_ids
        assert torch.equal(torch.tensor([plan.copies[p].expert for p in phys.reshape(-1).tolist()]),
                           ids.reshape(-1))
        assert torch.equal(torch.bincount(phys.reshape(-1), minlength=len(plan.copies)),
                           metrics.physical_loads(load_of(ids, E), plan))
    assert moved > 0  # LASER really moved tokens off top-k
    # --router rnq is --router topk --plan rnq
    install(model, "rnq", calib)
    with torch.no_grad():
        short = model(x)
    install(model, "topk", calib, plan="rnq")
    with torch.no_grad():
        assert torch.equal(model(x), short)
    install(model, "topk")


def test_routers_return_plans_and_the_model_applies_them(tiny_calibrated):
    from tinymoe.routing import install
    model, calib, _, _, _ = tiny_calibrated
    blocks = model.moe_blocks()
    E = blocks[0].ctx.rule.num_experts
    install(model, "topk")
    before = blocks[0].experts.plan
    plan = make_router("rnq").attach(blocks[0], calib.layer(blocks[0].ctx.layer))
    assert isinstance(plan, ExpertPlan) and len(plan.copies) > E
    assert blocks[0].experts.plan is before  # attaching changes nothing in the experts
    assert make_router("laser").attach(blocks[0], calib.layer(blocks[0].ctx.layer)) is None
    install(model, "rnq", calib)
    for block in blocks:
        st = block.ctx.state
        assert block.experts.plan is st["plan"] is block.router_plan and len(st["plan"].copies) > E
        assert block.experts.weight_bytes() == st["plan_bytes"] <= st["budget_bytes"]
    install(model, "laser", calib)  # a router without a plan: back to the default placement
    assert all(b.experts.plan == ExpertPlan.default(E) and b.router_plan is None for b in blocks)
    manual = ExpertPlan([Copy(e) for e in range(E)] + [Copy(0)])
    blocks[0].experts.apply_plan(manual)
    install(model, "balanced")  # a plan applied to the experts directly is not the router's to undo
    assert blocks[0].experts.plan is manual
    install(model, "topk")
    blocks[0].experts.apply_plan(ExpertPlan.default(E))


def test_routing_imports_neither_models_nor_experts_code():
    """Dependencies point models -> routing; routing reads only experts' data and pure helpers
    (plan, the byte rule, dispatch's copy assignment) and never changes the experts itself."""
    import ast
    from pathlib import Path
    import tinymoe.routing
    allowed = {"tinymoe.experts.plan", "tinymoe.experts.quant", "tinymoe.experts.dispatch", "tinymoe.experts.placement"}
    for path in Path(tinymoe.routing.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative to tinymoe.routing
                    module = ".".join(["tinymoe", "routing"][:3 - node.level] + ([module] if module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                assert not (isinstance(node, ast.Attribute) and node.attr == "apply_plan"), path.name
                continue
            for name in names:
                assert not name.startswith(("tinymoe.models", "tinymoe.engine")), (path.name, name)
                if name.startswith("tinymoe.experts"):
                    assert name in allowed, (path.name, name)


def test_cli_router_options_reach_the_base_router_under_a_plan(tiny_calibrated, monkeypatch):
    import json
    from click.testing import CliRunner
    import tinymoe.routing
    from tinymoe.cli import cli
    from tinymoe.routing.laser import Laser
    _, _, calib, data, _ = tiny_calibrated
    installed = []
    real = tinymoe.routing.install

    def spy(model, name="topk", calib=None, plan=None, **opts):
        real(model, name, calib, plan=plan, **opts)
        installed.append([b.router for b in model.moe_blocks()])
        return model

    monkeypatch.setattr(tinymoe.routing, "install", spy)
    common = ["--router", "laser", "--router-opt", "t_fix=0.5", "--plan", "rnq", "--calib", str(calib),
              "--data", str(data), "--format", "json"]
    r = CliRunner().invoke(cli, ["eval", "tiny", *common, "--plan-opt", "replica=int4",
                                 "--window", "32", "--max-windows", "2"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["router"] == "laser+rnq"
    planned = [routers for routers in installed if routers[0].name == "rnq"]
    assert planned and all(isinstance(x.base, Laser) and x.base.t_fix == 0.5 and x.replica == "int4"
                           for x in planned[0])
    installed.clear()
    r = CliRunner().invoke(cli, ["bench", "tiny", *common, "--batch", "4", "--prompt-len", "8",
                                 "--gen-len", "3", "--sequences", "4"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["router"] for row in rows] == ["laser+rnq"] and rows[0]["i_agg"] > 0
    planned = [routers for routers in installed if routers[0].name == "rnq"]
    assert planned and all(isinstance(x.base, Laser) and x.base.t_fix == 0.5 for x in planned[0])


def test_bad_plan_name_and_option_are_one_line_errors():
    from click.testing import CliRunner
    from tinymoe.cli import cli
    with pytest.raises(ValueError, match="unknown plan 'nope'; valid plans: rnq"):
        make_router("laser", plan="nope")
    with pytest.raises(ValueError, match="plan 'rnq' has no option t_fix; valid options: replicas, replica, quant"):
        make_router("laser", plan=("rnq", {"t_fix": 0.5}))
    with pytest.raises(ValueError, match="already carries the rnq plan"):
        make_router("rnq", plan="rnq")
    r = CliRunner().invoke(cli, ["generate", "tiny", "-p", "x", "--plan", "nope"])
    assert r.exit_code == 1 and r.stderr == "Error: unknown plan 'nope'; valid plans: rnq\n"
    r = CliRunner().invoke(cli, ["generate", "tiny", "-p", "x", "--plan", "rnq", "--plan-opt", "bad=1"])
    assert r.exit_code == 1 and "valid options: replicas, replica, quant" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    r = CliRunner().invoke(cli, ["generate", "tiny", "-p", "x", "--plan-opt", "replica=int4"])
    assert r.exit_code == 2 and "--plan-opt needs --plan" in r.output


# --- R&Q sized from its base router's loads (`calibrate(..., routers=...)`) ---


def test_calibration_under_laser_records_laser_loads(tiny_calibrated):
    """load.laser is what LASER routes on the calibration's windows (a LoadRecorder on a pass of
    the same windows under the installed LASER, attached to that calibration); load stays top-k's."""
    from tinymoe.routing import install
    from tinymoe.routing.calibrate import load_calibration
    model, calib, path, _, tokens = tiny_calibrated
    rows = tokens[:4096].view(-1, 64)
    recorded = {}
    for name in ("topk", "laser"):
        install(model, name, calib)
        rec = metrics.LoadRecorder().attach(model)
        with torch.no_grad():
            for s in range(0, rows.shape[0], 8):  # calibrate's windows, 8 a pass
                model(rows[s:s + 8])
        rec.detach(model)
        recorded[name] = rec.pooled("run")
    install(model, "topk")
    differ = 0
    for block in model.moe_blocks():
        layer = calib.layer(block.ctx.layer)
        assert torch.equal(layer["load.laser"], recorded["laser"][block.ctx.layer].float())
        assert torch.equal(layer["load"], recorded["topk"][block.ctx.layer].float())
        differ += not torch.equal(layer["load.laser"], layer["load"])
    assert differ == len(model.moe_blocks())
    assert load_calibration(path).meta["loads"] == {"laser": make_router("laser").opts}


def test_rnq_sizes_its_replicas_from_its_base_routers_loads(tiny_calibrated):
    from tinymoe.routing.calibrate import Calibration
    from tinymoe.routing.rnq import rnq_plan
    model, calib, _, _, _ = tiny_calibrated
    changed = 0
    for block in model.moe_blocks():
        layer = calib.layer(block.ctx.layer)
        bytes_of = {p: block.experts.copy_bytes(p) for p in ("full", "int8", "int4")}
        over_laser = make_router("laser", plan="rnq").attach(block, layer)
        over_topk = make_router("topk", plan="rnq").attach(block, layer)
        assert over_laser == rnq_plan(layer["load.laser"], layer["importance"], bytes_of)
        assert over_topk == rnq_plan(layer["load"], layer["importance"], bytes_of)
        changed += over_laser != over_topk
        # an old file (no load.topk key) serves topk + rnq from "load" as before
        assert "load.topk" not in layer
    assert changed > 0  # the loads differ, and so do the plans
    old = Calibration({i: {k: v for k, v in d.items() if k != "load.laser"} for i, d in calib.layers.items()},
                      calib.meta)
    block = model.moe_blocks()[0]
    for name in ("laser", "budget"):
        with pytest.raises(ValueError) as e:
            make_router(name, plan="rnq").attach(block, old.layer(block.ctx.layer))
        assert str(e.value) == (f"rnq over {name} needs the expert loads under {name} in the calibration file "
                                f"(run `tinymoe calibrate MODEL --data FILE --routers {name} --out "
                                f"calib.safetensors`)")
    with pytest.raises(ValueError, match=r"--data FILE --routers laser --out"):
        make_router("laser", plan="rnq").attach(block, None)


def test_calibrate_routers_are_checked_and_the_model_left_as_it_was(tiny_calibrated):
    from tinymoe.routing import install
    from tinymoe.routing.calibrate import calibrate
    model, calib, _, _, tokens = tiny_calibrated
    with pytest.raises(ValueError, match="valid routers"):
        calibrate(model, tokens[:256], seq_len=64, proto_steps=0, routers=["nope"])
    with pytest.raises(ValueError, match="not plans: 'rnq' is a plan"):
        calibrate(model, tokens[:256], seq_len=64, proto_steps=0, routers=["rnq"])
    install(model, "bias", calib)
    with torch.no_grad():
        model(tokens[:64].view(2, 32))  # the bias state exists once bias has routed
    blocks = model.moe_blocks()
    before = [(b.router, b.recorder, b.observer, b.ctx.state["bias"].clone()) for b in blocks]
    small = calibrate(model, tokens[:256], seq_len=64, proto_steps=0, routers=["topk", ("budget", {"delta": 0.3})])
    for b, (router, rec, obs, bias) in zip(blocks, before):
        assert (b.router, b.recorder, b.observer) == (router, rec, obs)
        assert torch.equal(b.ctx.state["bias"], bias)
        assert set(small.layer(b.ctx.layer)) == {"mass_quantiles", "load", "importance", "load.budget"}
    assert small.meta["loads"] == {"budget": {"delta": 0.3, "method": "fill"}}  # every option, defaults too
    install(model, "topk")


def test_calibrate_command_records_router_loads(tiny_calibrated, tmp_path, monkeypatch):
    from click.testing import CliRunner
    import tinymoe.cli as cli_module
    from tinymoe.routing.calibrate import load_calibration
    _, _, _, data, _ = tiny_calibrated
    out = tmp_path / "c.safetensors"
    args = ["calibrate", "tiny", "--data", str(data), "--out", str(out), "--seq-len", "64",
            "--max-tokens", "1000", "--proto-steps", "0"]
    r = CliRunner().invoke(cli_module.cli, [*args, "--routers", "laser, budget"])
    assert r.exit_code == 0, r.output
    assert "| 45/45 [" in r.stderr  # 15 windows: the top-k pass, then one pass per router
    layer = load_calibration(out).layer(1)
    assert {"load", "load.laser", "load.budget"} <= set(layer) and layer["load.budget"].sum() == layer["load"].sum()
    monkeypatch.setattr(cli_module, "_load", lambda *a: pytest.fail("the model was loaded"))
    for bad, message in (("nope", "unknown router 'nope'"), ("rnq", "'rnq' is a plan")):
        r = CliRunner().invoke(cli_module.cli, [*args, "--routers", bad])
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.splitlines()) == 1
