"""Routers by name: `make_router("laser", t_fix=0.3)`, `install(model, "laser")`."""
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


def make_router(name: str, **opts) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}")
    cls = ROUTERS[name]
    params = options(cls)
    bad = sorted(set(opts) - set(params))
    if bad:
        valid = ", ".join(params) or "none"
        raise ValueError(f"router {name!r} has no option {', '.join(bad)}; valid options: {valid}")
    return cls(**opts)


def install(model, name: str = "topk", calib=None, **opts):
    """Give every MoE block of `model` a fresh router `name` (state reset). `calib` is a
    calibration file path or a `Calibration` (routing/calibrate.py); routers read their layer."""
    from .calibrate import Calibration, load_calibration
    from ..experts.plan import ExpertPlan
    if calib is not None and not isinstance(calib, Calibration):
        calib = load_calibration(calib)
    for block in model.moe_blocks():
        router = make_router(name, **opts)
        if "plan" in block.ctx.state and hasattr(block.experts, "apply_plan"):
            block.experts.apply_plan(ExpertPlan.default(block.ctx.rule.num_experts))
        block.ctx.state.clear()
        router.attach(block, calib.layer(block.ctx.layer) if calib is not None else None)
        block.router = router
    return model


__all__ = ["GateRule", "RouteContext", "Router", "ROUTERS", "register", "make_router", "install"]
