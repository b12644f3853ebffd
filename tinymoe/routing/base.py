"""The router interface: gate logits in, (expert ids, weights) out; router options declared with
their type and range (`Option`), checked in one place when a router is built and attached."""
import math
import numbers
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GateRule:
    """A family's own gate: fp32 softmax over all experts, top-k, optional renormalisation."""
    num_experts: int
    top_k: int
    renormalize: bool

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def weights(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = probs.gather(-1, ids)
        return w / w.sum(-1, keepdim=True) if self.renormalize else w


@dataclass
class RouteContext:
    """Per-MoE-layer context, persistent across forward passes (routers keep state here)."""
    layer: int
    num_layers: int
    rule: GateRule
    state: dict = field(default_factory=dict)


LAYER_SIZES = ("k", "E")  # bounds named after the layer: its top-k and its expert count
_BAD = object()


@dataclass(frozen=True)
class Option:
    """One router option. kind: "number", "integer", "bool", "choice" (one of `choices`) or
    "router" (a router name or Router that is not a plan). lo/hi: inclusive bounds, numbers or
    "k"/"E", which only `Router.check_layer` can check. A default of None means "unset" is allowed.
    Strings (the CLI's values) are converted here, so the CLI and the library agree."""
    kind: str
    default: object = None
    lo: object = None
    hi: object = None
    choices: tuple = ()

    def describe(self, sizes: dict | None = None) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "router":
            names = ", ".join(sorted(n for n, c in ROUTERS.items() if not c.is_plan))
            return f"a router that is not a plan (one of {names})"
        lo, hi = ((sizes or {}).get(b, b) for b in (self.lo, self.hi))
        what = "a number" if self.kind == "number" else "an integer"
        if lo is not None and hi is not None:
            text = f"{what} in [{lo}, {hi}]"
        elif lo is not None:
            text = f"{what} >= {lo}"
        else:
            text = what
        if sizes is None and (self.lo in LAYER_SIZES or self.hi in LAYER_SIZES):
            text += " (k: the layer's top-k, E: its expert count)"
        return text

    def convert(self, value):
        """The value as this option holds it, or _BAD."""
        if value is None:
            return None if self.default is None else _BAD
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None
            return text == "true" if text in ("true", "false") else _BAD
        if self.kind == "choice":
            return value if isinstance(value, str) and value in self.choices else _BAD
        if self.kind == "router":
            cls = ROUTERS.get(value) if isinstance(value, str) else type(value)
            ok = cls is not None and issubclass(cls, Router) and not cls.is_plan
            return value if ok else _BAD
        integer = self.kind == "integer"
        if isinstance(value, str):
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                return _BAD
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
            return _BAD
        value = int(value) if integer else float(value)
        if not math.isfinite(value) or not self.in_range(value, {"k": 1}):
            return _BAD
        return value

    def in_range(self, value, sizes: dict) -> bool:
        lo, hi = (sizes.get(b, b) for b in (self.lo, self.hi))
        return not ((isinstance(lo, numbers.Real) and value < lo) or
                    (isinstance(hi, numbers.Real) and value > hi))


def check_options(what: str, name: str, spec: dict[str, Option], opts: dict) -> dict:
    """`opts` against `spec` -> every option's value (defaults filled in); one-line ValueError
    naming `what` ("router" or "plan") and `name` for an unknown option or a bad value."""
    unknown = sorted(set(opts) - set(spec))
    if unknown:
        raise ValueError(f"{what} {name!r} has no option {', '.join(unknown)}; "
                         f"valid options: {', '.join(spec) or 'none'}")
    values = {}
    for key, opt in spec.items():
        if key not in opts:
            values[key] = opt.default
            continue
        value = opt.convert(opts[key])
        if value is _BAD:
            raise ValueError(f"{what} {name!r} option {key} must be {opt.describe()}, got {opts[key]!r}")
        values[key] = value
    return values


class Router:
    """Subclasses declare their keyword options in OPTIONS, derive state from them in `setup`,
    and implement `route`. A plan (is_plan) wraps a base router and keeps its choice."""
    name = "?"
    OPTIONS: dict[str, Option] = {}
    is_plan = False

    def __init__(self, **opts):
        self.opts = check_options("router", self.name, self.OPTIONS, opts)
        for key, value in self.opts.items():
            setattr(self, key, value)
        self.setup()

    def setup(self) -> None:
        """State derived from the options (after they are checked)."""

    def check_layer(self, ctx: RouteContext) -> None:
        """The options bounded by the layer (k, E) against this layer; `install` calls it on every
        layer before attaching anything."""
        sizes = {"k": ctx.rule.top_k, "E": ctx.rule.num_experts}
        for key, opt in self.OPTIONS.items():
            value = self.opts[key]
            if value is None or opt.kind not in ("number", "integer") or opt.in_range(value, sizes):
                continue
            raise ValueError(f"router {self.name!r} option {key} must be {opt.describe(sizes)} for layer "
                             f"{ctx.layer} ({sizes['E']} experts, top-{sizes['k']}), got {value!r}")

    def attach(self, block, calib: dict | None):
        """Called once per MoE block by `install`, before any `route`: read this layer's
        calibration tensors (or None) and what the router needs of the block (its gate, the
        experts' shapes), without changing the block. A router that places the experts
        differently returns that placement, an `ExpertPlan`, which the model applies; None keeps
        the default placement."""
        return None

    def route(self, logits: torch.Tensor, hidden: torch.Tensor, ctx: RouteContext):
        raise NotImplementedError


ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ROUTERS[name] = cls
        return cls
    return deco
