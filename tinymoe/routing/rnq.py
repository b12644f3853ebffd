"""Replicate-and-Quantize (docs/routing.md, section 5): replicate heavy-hitter experts in a lower
precision and pay for the replicas by quantising unimportant experts, within the layer's
original weight bytes, counted as the expert pools store them (`Experts.copy_bytes`, which is
`experts.quant.expert_bytes` in the experts' base precision and int4 group).
The router's choice is the base router's; the plan (an `ExpertPlan` that `attach` returns and
the model applies) changes only which physical copy serves each assignment. The replicas are sized
from the base router's own calibrated loads (`calibrate(..., routers=[name])`; top-k's: "load")."""
import torch

from ..experts.plan import PRECISIONS, Copy, ExpertPlan
from .base import Option, Router, register


def plan_bytes(plan: ExpertPlan, bytes_of: dict[str, int]) -> int:
    return sum(bytes_of[c.precision] for c in plan.copies)


def rnq_plan(load, importance, bytes_of: dict[str, int], replica: str = "int8",
             quant: str = "int4", replicas: int | None = None) -> ExpertPlan:
    """Greedy (as EPLB): add a `replica`-precision copy to the expert of largest load/copies, then
    store the least important unreplicated experts in `quant` until the layer fits its original
    bytes; stop when it no longer fits, after `replicas` extra copies, or (replicas=None) when no
    copy carries more than the mean expert load. Copies 0..E-1 are the originals, in order."""
    load = [float(x) for x in load]
    E = len(load)
    budget = E * bytes_of["full"]
    least_important = sorted(range(E), key=lambda e: float(importance[e]))
    copies, quantised = [1] * E, set()

    def fit(copies):
        quantised, used = set(), sum(bytes_of["full"] + (n - 1) * bytes_of[replica] for n in copies)
        for e in least_important:
            if used <= budget:
                break
            if copies[e] == 1:
                quantised.add(e)
                used += bytes_of[quant] - bytes_of["full"]
        return quantised if used <= budget else None

    mean = sum(load) / E
    while replicas is None or sum(copies) - E < replicas:
        e = max(range(E), key=lambda i: load[i] / copies[i])
        if replicas is None and load[e] / copies[e] <= mean:
            break
        trial = copies[:e] + [copies[e] + 1] + copies[e + 1:]
        q = fit(trial)
        if q is None:
            break
        copies, quantised = trial, q
    originals = [Copy(e, quant if e in quantised else "full") for e in range(E)]
    extra = [Copy(e, replica) for e in range(E) for _ in range(copies[e] - 1)]
    return ExpertPlan(originals + extra)


@register("rnq")
class ReplicateQuantize(Router):
    """Options: base (the router whose choice is kept: a name, default options, or a Router, as
    `make_router(name, plan="rnq", **opts)` builds it), replicas (extra copies per layer; default
    until no copy is heavier than the mean expert), replica and quant precisions."""
    is_plan = True
    OPTIONS = {"base": Option("router", "topk"), "replicas": Option("integer", None, lo=0),
               "replica": Option("choice", "int8", choices=PRECISIONS[1:]),
               "quant": Option("choice", "int4", choices=PRECISIONS[1:])}

    def setup(self):
        from . import make_router
        if isinstance(self.base, str):
            self.base = make_router(self.base)

    def check_layer(self, ctx):
        super().check_layer(ctx)
        self.base.check_layer(ctx)

    def attach(self, block, calib):
        # the replicas are sized from the loads the base router gives (measured under it)
        from .calibrate import load_key
        name = self.base.name
        if calib is None or "load" not in calib or "importance" not in calib:
            routers = "" if name == "topk" else f" --routers {name}"
            raise ValueError(f"rnq needs a calibration file with expert loads and importance (run `tinymoe "
                             f"calibrate MODEL --data FILE{routers} --out calib.safetensors`, then pass "
                             f"--calib calib.safetensors)")
        if load_key(name) not in calib:
            raise ValueError(f"rnq over {name} needs the expert loads under {name} in the calibration file "
                             f"(run `tinymoe calibrate MODEL --data FILE --routers {name} --out calib.safetensors`)")
        load = calib[load_key(name)]
        self.base.attach(block, calib)
        experts = block.experts  # only its sizes are read: a copy's bytes as stored ("full": the base)
        E = experts.num_experts
        bytes_of = {p: experts.copy_bytes(p) for p in PRECISIONS}
        plan = rnq_plan(load, calib["importance"], bytes_of, self.replica, self.quant, self.replicas)
        block.ctx.state.update(plan=plan, plan_bytes=plan_bytes(plan, bytes_of),
                               budget_bytes=E * bytes_of["full"], copy_weight=copy_weights(plan, load))
        return plan  # the model applies it (MoEBlock.set_router)

    def route(self, logits, hidden, ctx):
        return self.base.route(logits, hidden, ctx)


def copy_weights(plan: ExpertPlan, load) -> torch.Tensor:
    """Expected tokens per physical copy from calibration loads (for placing copies on devices)."""
    n = torch.zeros(len(plan.copies))
    counts = torch.bincount(torch.tensor([c.expert for c in plan.copies]))
    for i, c in enumerate(plan.copies):
        n[i] = float(load[c.expert]) / int(counts[c.expert])
    return n
