"""Routers by name: `make_router("laser", t_fix=0.3)`, `install(model, "laser")`."""
import inspect

from .base import ROUTERS, GateRule, RouteContext, Router, register
from . import topk  # noqa: F401  (registers)


def make_router(name: str, **opts) -> Router:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}")
    cls = ROUTERS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(opts) - set(params))
    if bad:
        valid = ", ".join(params) or "none"
        raise ValueError(f"router {name!r} has no option {', '.join(bad)}; valid options: {valid}")
    return cls(**opts)


def install(model, name: str = "topk", calib=None, **opts):
    """Give every MoE block of `model` a fresh router `name` (state reset)."""
    for block in model.moe_blocks():
        block.router = make_router(name, **opts)
        block.ctx.state.clear()
    return model


__all__ = ["GateRule", "RouteContext", "Router", "ROUTERS", "register", "make_router", "install"]
