"""Routers by name: `make_router("laser", t_fix=0.3)`, `install(model, "laser")`; an expert plan
over any router's choice: `make_router("laser", plan="rnq")` (docs/routing.md, section 5). Every
option's type and range is declared in its router's OPTIONS (base.Option) and checked when the
router is built; bounds set by the model (LASER's c <= E) when `install` attaches it."""
from .base import ROUTERS, GateRule, Option, RouteContext, Router, check_options, register
from . import topk, laser, budget, prototype, rnq, bias, bounds  # noqa: F401  (register)


def options(cls) -> list[str]:
    """A router class's keyword options, in declaration order."""
    return list(cls.OPTIONS)


# Plans keep a base router's choice and change which physical expert copies serve it. A plan is a
# Router class with is_plan, taking `base` (a Router) plus its own options; `--router rnq` is
# topk + plan rnq.
PLANS: dict[str, type[Router]] = {name: cls for name, cls in ROUTERS.items() if cls.is_plan}


def plan_spec(plan) -> tuple[str, dict] | None:
    """Check a `plan` argument: None, a plan name, or (name, {option: value}) -> (name, options),
    the options' values checked and converted."""
    if plan is None:
        return None
    name, opts = (plan, {}) if isinstance(plan, str) else (plan[0], dict(plan[1] or {}))
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; valid plans: {', '.join(sorted(PLANS))}")
    spec = {key: opt for key, opt in PLANS[name].OPTIONS.items() if key != "base"}
    values = check_options("plan", name, spec, opts)
    return name, {key: values[key] for key in opts}


def label(name: str, plan=None) -> str:
    """How tables name a router with a plan: "laser+rnq"."""
    spec = plan_spec(plan)
    return name if spec is None else f"{name}+{spec[0]}"


def make_router(name: str, plan=None, **opts) -> Router:
    """Router `name` with `opts`; with `plan` (a name or (name, options)), that plan over it."""
    spec = plan_spec(plan)
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}")
    router = ROUTERS[name](**opts)
    if spec is None:
        return router
    if router.is_plan:
        raise ValueError(f"router {name!r} already carries the {spec[0]} plan; give the base router "
                         f"instead (e.g. --router topk --plan {spec[0]})")
    return PLANS[spec[0]](base=router, **spec[1])


def install(model, name: str = "topk", calib=None, plan=None, **opts):
    """Give every MoE block of `model` a fresh router `name` (state reset), with `plan` over it if
    given. `calib` is a calibration file path or a `Calibration` (routing/calibrate.py); routers
    read their layer. Every router is built and checked against its layer before any is attached,
    and attached to every block before any block takes it: the block
    (`set_router(router, expert_plan)`) applies the expert plan the router returns, or puts back
    the default placement if its previous router had placed the experts."""
    calib = check_before_loading(model.config, name, calib, plan, **opts)
    if calib is not None:
        calib.check(model)  # and its gate fingerprints, now that the weights are here
    blocks = model.moe_blocks()
    routers = [make_router(name, plan=plan, **opts) for _ in blocks]
    placements = []
    for block, router in zip(blocks, routers):
        block.ctx.state.clear()
        placements.append(router.attach(block, calib.layer(block.ctx.layer) if calib is not None else None))
    for block, router, placement in zip(blocks, routers, placements):
        block.set_router(router, placement)
    return model


def check_before_loading(cfg, name: str, calib=None, plan=None, **opts):
    """What `install` would refuse, found from the model's config alone, so that a bad option or
    a calibration file from another model is one line before any weight is read. Returns the
    calibration (read once here, a path or a Calibration) for `install`."""
    from .calibrate import Calibration, load_calibration
    router = make_router(name, plan=plan, **opts)
    rule = GateRule(cfg.num_experts, cfg.top_k, cfg.renormalize)
    for layer, moe in enumerate(cfg.moe_layers):
        if moe:
            router.check_layer(RouteContext(layer, cfg.num_layers, rule))
    if calib is not None and not isinstance(calib, Calibration):
        calib = load_calibration(calib)
    if calib is not None:
        calib.check_config(cfg)
    return calib


__all__ = ["GateRule", "Option", "RouteContext", "Router", "ROUTERS", "PLANS", "register", "make_router",
           "install", "check_before_loading", "label", "plan_spec", "options"]
