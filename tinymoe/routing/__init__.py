"""Routers by name: `make_router("laser", t_fix=0.3)`, `install(model, "laser")`; an expert plan
over any router's choice: `make_router("laser", plan="rnq")` (ALGORITHMS.md section 4)."""
import inspect

from .base import ROUTERS, GateRule, RouteContext, Router, register
from . import topk, laser, prototype, rnq, bias, bounds  # noqa: F401  (register)


def options(cls) -> list[str]:
    """A router class's keyword options (none for a class without its own __init__)."""
    if cls.__init__ is object.__init__:
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind in kinds and p.name != "self"]


# Plans keep a base router's choice and change which physical expert copies serve it. A plan is a
# Router class taking `base` (a Router) plus its own options; `--router rnq` is topk + plan rnq.
PLANS: dict[str, type[Router]] = {"rnq": rnq.ReplicateQuantize}


def plan_spec(plan) -> tuple[str, dict] | None:
    """Check a `plan` argument: None, a plan name, or (name, {option: value}) -> (name, options)."""
    if plan is None:
        return None
    name, opts = (plan, {}) if isinstance(plan, str) else (plan[0], dict(plan[1] or {}))
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; valid plans: {', '.join(sorted(PLANS))}")
    valid = [o for o in options(PLANS[name]) if o != "base"]
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ValueError(f"plan {name!r} has no option {', '.join(bad)}; valid options: {', '.join(valid)}")
    return name, dict(opts)


def label(name: str, plan=None) -> str:
    """How tables name a router with a plan: "laser+rnq"."""
    spec = plan_spec(plan)
    return name if spec is None else f"{name}+{spec[0]}"


def make_router(name: str, plan=None, **opts) -> Router:
    """Router `name` with `opts`; with `plan` (a name or (name, options)), that plan over it."""
    spec = plan_spec(plan)
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}")
    cls = ROUTERS[name]
    params = options(cls)
    bad = sorted(set(opts) - set(params))
    if bad:
        valid = ", ".join(params) or "none"
        raise ValueError(f"router {name!r} has no option {', '.join(bad)}; valid options: {valid}")
    router = cls(**opts)
    if spec is None:
        return router
    if isinstance(router, PLANS[spec[0]]):
        raise ValueError(f"router {name!r} already carries the {spec[0]} plan; give the base router "
                         f"instead (e.g. --router topk --plan {spec[0]})")
    return PLANS[spec[0]](base=router, **spec[1])


def install(model, name: str = "topk", calib=None, plan=None, **opts):
    """Give every MoE block of `model` a fresh router `name` (state reset), with `plan` over it if
    given. `calib` is a calibration file path or a `Calibration` (routing/calibrate.py); routers
    read their layer."""
    from .calibrate import Calibration, load_calibration
    from ..experts.plan import ExpertPlan
    if calib is not None and not isinstance(calib, Calibration):
        calib = load_calibration(calib)
    for block in model.moe_blocks():
        router = make_router(name, plan=plan, **opts)
        if "plan" in block.ctx.state and hasattr(block.experts, "apply_plan"):
            block.experts.apply_plan(ExpertPlan.default(block.ctx.rule.num_experts))
        block.ctx.state.clear()
        router.attach(block, calib.layer(block.ctx.layer) if calib is not None else None)
        block.router = router
    return model


__all__ = ["GateRule", "RouteContext", "Router", "ROUTERS", "PLANS", "register", "make_router", "install",
           "label", "plan_spec"]
