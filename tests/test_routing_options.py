"""Router and plan options: declared types and ranges, checked when a router is built (make_router,
the routers' classes, plan_spec) and, for bounds set by the model, when `install` attaches it;
one line naming the option, its range and the value; the CLI gives the library's message."""
import pytest
import torch
from click.testing import CliRunner

import tinymoe
from tinymoe.cli import cli
from tinymoe.routing import GateRule, RouteContext, install, make_router, plan_spec
from tinymoe.routing.laser import Laser

LAYER = "(k: the layer's top-k, E: its expert count)"
SEED_RANGE = f"[0, {2**64 - 1}]"
BAD = [
    ("laser", {"t_fix": "abc"}, "router 'laser' option t_fix must be a number in [0, 1], got 'abc'"),
    ("laser", {"t_fix": -5}, "router 'laser' option t_fix must be a number in [0, 1], got -5"),
    ("laser", {"t_fix": "1.5"}, "router 'laser' option t_fix must be a number in [0, 1], got '1.5'"),
    ("laser", {"exact": "maybe"}, "router 'laser' option exact must be true or false, got 'maybe'"),
    ("laser", {"exact": 1}, "router 'laser' option exact must be true or false, got 1"),
    ("laser", {"q": True}, "router 'laser' option q must be a number in [0, 1], got True"),
    ("laser", {"q": float("nan")}, "router 'laser' option q must be a number in [0, 1], got nan"),
    ("laser", {"eps_high": "high"}, "router 'laser' option eps_high must be a number in [0, 1], got 'high'"),
    ("laser", {"t_fix": None}, "router 'laser' option t_fix must be a number in [0, 1], got None"),
    ("laser", {"c": 0}, f"router 'laser' option c must be an integer in [k, E] {LAYER}, got 0"),
    ("laser", {"c": 2.5}, f"router 'laser' option c must be an integer in [k, E] {LAYER}, got 2.5"),
    ("laser", {"c": "four"}, f"router 'laser' option c must be an integer in [k, E] {LAYER}, got 'four'"),
    ("bias", {"gamma": -0.1}, "router 'bias' option gamma must be a number >= 0, got -0.1"),
    ("bias", {"gamma": "inf"}, "router 'bias' option gamma must be a number >= 0, got 'inf'"),
    ("random", {"seed": -1}, f"router 'random' option seed must be an integer in {SEED_RANGE}, got -1"),
    ("random", {"seed": "1.5"}, f"router 'random' option seed must be an integer in {SEED_RANGE}, got '1.5'"),
    ("prototype", {"weights": "cosine"},
     "router 'prototype' option weights must be one of model, prototype, got 'cosine'"),
    ("rnq", {"replica": "fp8"}, "router 'rnq' option replica must be one of int8, int4, got 'fp8'"),
    ("rnq", {"quant": "full"}, "router 'rnq' option quant must be one of int8, int4, got 'full'"),
    ("rnq", {"replicas": -1}, "router 'rnq' option replicas must be an integer >= 0, got -1"),
    ("rnq", {"replicas": "a few"}, "router 'rnq' option replicas must be an integer >= 0, got 'a few'"),
    ("rnq", {"base": "rnq"}, "router 'rnq' option base must be a router that is not a plan (one of "
                             "balanced, bias, budget, laser, prototype, random, topk), got 'rnq'"),
    ("rnq", {"base": "nope"}, "router 'rnq' option base must be a router that is not a plan (one of "
                              "balanced, bias, budget, laser, prototype, random, topk), got 'nope'"),
    ("topk", {"k": 3}, "router 'topk' has no option k; valid options: none"),
    ("laser", {"tfix": 0.1}, "router 'laser' has no option tfix; valid options: eps_high, q, t_fix, c, exact"),
]


@pytest.mark.parametrize("name,opts,message", BAD)
def test_bad_router_option_is_one_line_at_construction(name, opts, message):
    with pytest.raises(ValueError) as e:
        make_router(name, **opts)
    assert str(e.value) == message
    with pytest.raises(ValueError) as e:  # the classes check it themselves, without the registry
        tinymoe.routing.ROUTERS[name](**opts)
    assert str(e.value) == message


def test_bad_plan_option_is_one_line_before_any_router_is_built():
    expected = "plan 'rnq' option replica must be one of int8, int4, got 'fp8'"
    for bad in (lambda: plan_spec(("rnq", {"replica": "fp8"})),
                lambda: make_router("laser", plan=("rnq", {"replica": "fp8"}))):
        with pytest.raises(ValueError) as e:
            bad()
        assert str(e.value) == expected
    with pytest.raises(ValueError) as e:
        plan_spec(("rnq", {"replicas": "-2"}))
    assert str(e.value) == "plan 'rnq' option replicas must be an integer >= 0, got '-2'"
    with pytest.raises(ValueError) as e:
        plan_spec(("rnq", {"base": "laser"}))
    assert str(e.value) == "plan 'rnq' has no option base; valid options: replicas, replica, quant"


def test_good_values_are_accepted_and_strings_converted():
    r = make_router("laser", t_fix="0.5", q=1, exact="TRUE", c="3", eps_high="0")
    assert (r.t_fix, r.q, r.exact, r.c, r.eps_high) == (0.5, 1.0, True, 3, 0.0)
    assert type(r.q) is float and type(r.c) is int
    r = make_router("laser")
    assert (r.t_fix, r.q, r.exact, r.c, r.eps_high) == (0.3, 0.5, False, None, None)
    r = make_router("laser", exact="false", t_fix=0, q=" 0.25 ")
    assert (r.exact, r.t_fix, r.q) == (False, 0.0, 0.25)
    assert make_router("bias", gamma="1e-2").gamma == 0.01
    assert make_router("bias", gamma=0).gamma == 0.0
    assert make_router("random", seed="7").seed == 7
    assert make_router("prototype", weights="prototype").weights == "prototype"
    r = make_router("rnq", replicas="2", replica="int4", quant="int8", base="laser")
    assert (r.replicas, r.replica, r.quant, type(r.base)) == (2, "int4", "int8", Laser)
    r = make_router("laser", c=4, plan=("rnq", {"replicas": "0"}))
    assert r.replicas == 0 and r.base.c == 4
    assert plan_spec(("rnq", {"replicas": "3", "quant": "int8"})) == ("rnq", {"replicas": 3, "quant": "int8"})


def test_layer_bounds_checked_when_routing_without_install():
    ctx = RouteContext(3, 4, GateRule(8, 2, True))
    with pytest.raises(ValueError) as e:
        make_router("laser", c=9).route(torch.randn(4, 8), None, ctx)
    assert str(e.value) == ("router 'laser' option c must be an integer in [2, 8] for layer 3 "
                            "(8 experts, top-2), got 9")
    for c in (2, 8):  # both ends of the range
        ids, _ = make_router("laser", c=c, eps_high=1.0).route(torch.randn(4, 8), None, ctx)
        assert ids.shape == (4, 2)


@pytest.fixture(scope="module")
def mixtral_model(tiny_mixtral):  # 6 experts, top-2, every layer MoE
    return tinymoe.load_model(tiny_mixtral, dtype="float32")


@pytest.fixture(scope="module")
def deepseek_model(tiny_deepseek):  # 12 experts, top-4, layer 0 dense
    return tinymoe.load_model(tiny_deepseek, dtype="float32")


def routers_of(model):
    return [(b.router, dict(b.ctx.state)) for b in model.moe_blocks()]


@pytest.mark.parametrize("opts,plan,message", [
    ({"c": 100}, None, "router 'laser' option c must be an integer in [2, 6] for layer 0 (6 experts, top-2), got 100"),
    ({"c": 1}, None, "router 'laser' option c must be an integer in [2, 6] for layer 0 (6 experts, top-2), got 1"),
    ({"c": 7}, "rnq", "router 'laser' option c must be an integer in [2, 6] for layer 0 (6 experts, top-2), got 7"),
    ({"t_fix": "abc"}, None, "router 'laser' option t_fix must be a number in [0, 1], got 'abc'"),
    ({"t_fix": -5}, None, "router 'laser' option t_fix must be a number in [0, 1], got -5"),
    ({"exact": "maybe"}, None, "router 'laser' option exact must be true or false, got 'maybe'"),
    ({}, ("rnq", {"quant": "int3"}), "plan 'rnq' option quant must be one of int8, int4, got 'int3'"),
])
def test_install_refuses_bad_values_before_touching_the_model(mixtral_model, opts, plan, message):
    install(mixtral_model, "topk")
    before = routers_of(mixtral_model)
    with pytest.raises(ValueError) as e:
        install(mixtral_model, "laser", plan=plan, **opts)  # no calib: the check comes before rnq needs one
    assert str(e.value) == message
    after = routers_of(mixtral_model)
    assert all(a[0] is b[0] and a[1] == b[1] for a, b in zip(after, before))


def test_install_names_the_layer_and_its_expert_count(deepseek_model):
    with pytest.raises(ValueError) as e:
        install(deepseek_model, "laser", c=13)
    assert str(e.value) == ("router 'laser' option c must be an integer in [4, 12] for layer 1 "
                            "(12 experts, top-4), got 13")
    install(deepseek_model, "laser", c="12", t_fix="0.5")
    assert all(b.router.c == 12 and b.router.t_fix == 0.5 for b in deepseek_model.moe_blocks())
    with torch.no_grad():
        assert torch.isfinite(deepseek_model(torch.arange(16).view(2, 8))).all()
    install(deepseek_model, "topk")


def test_install_accepts_good_values_and_routes(mixtral_model):
    x = torch.arange(24).view(3, 8) % 96
    for opts in ({"c": 6, "exact": "true"}, {"c": "2"}, {"t_fix": 1, "q": "0"}, {}):
        install(mixtral_model, "laser", **opts)
        with torch.no_grad():
            assert torch.isfinite(mixtral_model(x)).all()
    install(mixtral_model, "laser", t_fix=1, q="0")
    assert all((b.router.t_fix, b.router.q) == (1.0, 0.0) for b in mixtral_model.moe_blocks())
    for name, opts in (("bias", {"gamma": "0.01"}), ("random", {"seed": "3"}), ("balanced", {})):
        install(mixtral_model, name, **opts)
        with torch.no_grad():
            assert torch.isfinite(mixtral_model(x)).all()
    install(mixtral_model, "topk")


@pytest.mark.parametrize("opt,message", [
    ("t_fix=abc", "router 'laser' option t_fix must be a number in [0, 1], got 'abc'"),
    ("exact=maybe", "router 'laser' option exact must be true or false, got 'maybe'"),
    ("c=100", "router 'laser' option c must be an integer in [2, 8] for layer 0 (8 experts, top-2), got 100"),
])
def test_cli_gives_the_library_message_before_loading(opt, message, monkeypatch):
    from tinymoe.models import loader
    monkeypatch.setattr(loader.Checkpoint, "__init__", lambda *a: pytest.fail("the weights were opened"))
    r = CliRunner().invoke(cli, ["generate", "tiny", "-p", "x", "--max-tokens", "2", "--router", "laser",
                                 "--router-opt", opt])
    assert r.exit_code == 1
    assert r.stderr == f"Error: {message}\n"


def test_llm_checks_router_options_against_the_config_before_loading(monkeypatch):
    from tinymoe.models import loader
    monkeypatch.setattr(loader.Checkpoint, "__init__", lambda *a: pytest.fail("the weights were opened"))
    with pytest.raises(ValueError) as e:
        tinymoe.LLM("tiny-deepseek", router="laser", router_opts={"c": 40})
    assert str(e.value) == "router 'laser' option c must be an integer in [6, 32] for layer 1 (32 experts, top-6), " \
                           "got 40"
